"""Converting published DyHead checkpoints (official detectron2 code, MMDetection) into ours.

reading.py      safe reading of foreign checkpoint files (no pickled code ever runs)
dyhead_keys.py  the DyHead tower's key map (``convert_dyhead``)
capabilities.py what a reference architecture needs and which recipe field expresses it (``Gap``s)
reference.py    what a reference checkpoint was trained with, read from its keys, shapes and meta
mapping.py      every source key onto our ``Detector``'s state dict (or listed as dropped)
checkpoint.py   the whole conversion and ``dyhead convert``'s file I/O
"""
