"""Decode attention backends and their caches: full attention, the token-budget baselines,
DASH-KV's hashed attention, the method registry and sequence sharding. Imports `models` and
`hashing` (the encoders a hashed method runs), never `evaluation`."""
