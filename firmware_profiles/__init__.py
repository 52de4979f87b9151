"""Firmware profiles of edge boards, one TOML file each (package data)."""
