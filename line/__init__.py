"""The line layer: everything beyond the paper, one job per module, built on the reference core (inpformer.py,
data.py, metrics.py, train.py, evaluate.py). A core script imports a module of it only where a flag, a
checkpoint's geometry, an image's pixel format or a weight file's format needs it.
"""
