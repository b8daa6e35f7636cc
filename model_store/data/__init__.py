"""Images for merging and evaluation: built-in datasets, image folders, CSV manifests, decoding, preprocessing.

One concept for every zoo (:mod:`model_store.data.sources`): each task names where its ``calibration``
images (unlabeled) and its ``test`` images (labeled) come from. Imports only ``model_store``.
"""
