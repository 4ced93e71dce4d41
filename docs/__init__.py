"""The project's documentation (the Markdown files beside this one), shipped with the package so that the
"docs/*.md" named in docstrings is there in an installed copy too: ``importlib.resources.files("fastface_pl.docs")``.
"""
