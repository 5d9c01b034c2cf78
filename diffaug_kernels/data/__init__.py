"""Data: the local data sets (datasets.py: digits, ImageFolder trees, CIFAR-10), corruptions (corruptions.py),
the evaluation's dataset specs (eval_sets.py) and the training views (views.py). Nothing is downloaded."""
from . import corruptions, eval_sets, views
from .datasets import CIFAR10, digits, image_folder, make_dataset

__all__ = ["CIFAR10", "corruptions", "digits", "eval_sets", "image_folder", "make_dataset", "views"]
