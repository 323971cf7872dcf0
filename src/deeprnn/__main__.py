from deeprnn.cli import main

raise SystemExit(main())
