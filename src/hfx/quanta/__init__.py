"""Quanta discovery: cluster the tokens a model predicts well by the similarity of their loss gradients."""
