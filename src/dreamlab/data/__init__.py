"""Training data: the emoji dataset's format and split rule (``catalog``), its builder (``emoji``), captions
(``captions``) and loader (``dataset``). Readers import ``catalog``, never the builder."""
