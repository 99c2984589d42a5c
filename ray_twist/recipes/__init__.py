"""Recipes: whole workflows written over the public API, the way a user would write them.

demo        `twist demo`: synthetic world → pool → adapt → evaluate → restyle → serve
demo_real   `twist demo --real`: the same on a real-text corpus
study       the low-resource study (`jobs/low_resource.py`): fractions × inits × seeds
"""
