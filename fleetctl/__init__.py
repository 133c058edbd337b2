"""fleetctl: the command-line client of fleetd's control API (docs/api.md)."""
