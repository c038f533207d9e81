"""Training data: the emoji dataset builder (``emoji``), its captions (``captions``) and loader (``dataset``)."""
