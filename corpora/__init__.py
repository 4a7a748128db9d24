"""Corpora: the datasets emollama reads (MERR, MER2023, DFEW, EMER, plain folders). The bottom of the
house: it imports no other emollama part."""
