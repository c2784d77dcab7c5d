"""Quanta discovery: cluster the tokens a model predicts well by the similarity of their loss gradients.

Stages, one module each, in order (documents come from hfx.documents): losses -> filters -> gradients -> similarity -> clustering -> viewer;
pipeline.py chains them under one run directory (`hfx quanta run`).
"""
