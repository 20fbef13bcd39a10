"""Applications built on prunejax: complete programs that use the library the way a user would.

* :mod:`prunejax.apps.mnist` — LeNet-300-100 on MNIST: data, training loop, checkpoints, the
  Han et al. (2015) and Zhu & Gupta (2017) pruning recipes, and the ``prunejax mnist`` command.

The core package never imports this one; ``prunejax`` resolves the application's names lazily.
"""
