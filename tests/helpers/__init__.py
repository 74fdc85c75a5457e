"""Helpers shared by test files in different folders of tests/ (a test file never imports another test file)."""
