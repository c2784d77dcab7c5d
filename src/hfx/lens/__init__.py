"""Consistency Lens: activation -> text -> activation, trained so the reconstruction keeps the model's behaviour."""
