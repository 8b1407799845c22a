"""What the scripts run, with typed settings in and results out: the sweep, the fast estimate, exploration, fine-
tuning and training.
"""
