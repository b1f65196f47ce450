"""The hashers: key and query encoders, q/k capture from a frozen model, training, and the
exported artifact. Imports `models` only."""
