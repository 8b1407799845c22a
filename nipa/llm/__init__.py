"""Language models: loading (transformers, GGUF), the mapping preset, and the tasks they are scored on.
"""
