"""Layers shared by every model: pure math over tensors, tensor-parallel where it matters."""
