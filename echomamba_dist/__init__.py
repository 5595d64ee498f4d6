"""echomamba-dist: EchoMamba4Rec sequential recommenders on Ray.

Importing this package is cheap: it starts nothing and imports neither Ray, MLflow, mamba-ssm,
causal-conv1d nor Triton. Those are imported where they are used.
"""

__version__ = "0.1.0"
