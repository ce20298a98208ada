"""The sans-IO core: decisions over bytes and facts, with no networking, no Trio, no LMDB.

Everything in this package is pure: it takes bytes or reported facts and returns events or
verdicts. The I/O layer (``tproxy/*.py``) feeds it and acts on what it says.
"""
