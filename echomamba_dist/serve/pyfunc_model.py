"""The code MLflow logs with every recommender model and runs to load it (MLflow's "models from
code": the model is this file plus its artifacts, not a pickled object). Loading it needs this
package, which travels with the model (`code_paths`)."""

import mlflow

from echomamba_dist.serve.pyfunc import EchoMambaRecommender

mlflow.models.set_model(EchoMambaRecommender())
