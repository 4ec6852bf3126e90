"""Helpers shared by test modules of every kind. Test modules import helpers only from here (and take
fixtures from the conftest files); no test module imports another."""
