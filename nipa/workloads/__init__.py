"""What is evaluated: the Workload, the model registry and checkpoints, a user's model file, datasets and their
transforms.
"""
