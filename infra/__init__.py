"""Running the platform on a cluster: container image, KubeRay manifests, MLflow server, cluster launcher.

See infra/README.md. ``python -m infra.render`` generates the RayService's Serve config.
"""
