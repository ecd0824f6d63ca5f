"""Tests for t2i-r1. CPU only, tiny random models, seconds each; GPU and reference checks skip cleanly.

Run: python -m pytest -q test_t2i_r1.py
"""
