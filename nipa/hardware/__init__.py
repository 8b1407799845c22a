"""Hardware points and device physics: the INI search space, quantization and slicing, device errors, layer
mapping, the original tool's switches and the cost model.
"""
