"""Image stage: a ``Cooked`` input and a base image in, an OCI image out.

``base`` reads base images (registry, OCI layout, local store) and ``base_resolution``
picks the one a build may use (constraint, lock pin, variant, runner contract);
``contract`` checks the config against what that base's runner accepts; ``provenance``
makes the labels and provenance.json; ``assemble`` writes deterministic layers and the
manifest; ``store`` is the local image store every build lands in; ``docker_backend`` is
the ``docker build`` alternative; ``base_build`` builds the inference base image itself.
"""
