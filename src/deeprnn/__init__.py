"""deeprnn: deep recurrent language models after Dive into Deep Learning, section 9.3."""

__version__ = "0.1.0"
