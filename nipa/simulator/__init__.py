"""The ground truth: the bit-and-crossbar slicing simulator, its naive and original-structure baselines, the MLC
one-to-one chip, and evaluation of a model on its data.
"""
