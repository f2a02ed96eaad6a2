"""Cook stage: a customer's config at a git ref in, a ``Cooked`` build input out.

``load`` reads customer.yaml and the short analysis YAML from git; ``resolve`` looks each
model id up in the model registry (``registries/``: ClearML or a local folder); ``expand``
turns the short config into the verbose one the runner loads; ``fetch`` downloads the
published weights (``storage``: the production bucket) into the verified cache; ``lock``
pins all of it. ``stage`` runs them in order (``cook``) and is what the pipeline calls.
"""
