"""The run recipes of `mnv4_train.main`, shipped as package data (`*.gin`).

A package so that an installed wheel carries them: `mnv4_train.main` finds this folder with
`importlib.resources`, in a checkout and in site-packages alike.
"""
