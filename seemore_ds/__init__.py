"""seemore-ds: a DeepSpeed-powered trainer for the Seemore vision-language model."""

__version__ = "0.1.0"
