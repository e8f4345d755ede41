"""Flax linen modules: encoders, decoders, heads and the TaskModel that holds them."""
