"""The Prefect flow over the stages, its deployments, and the `jora` command line."""
