"""The teaching notebooks (``notebooks/*.ipynb``) and the tool that executes and checks them (``run``)."""
