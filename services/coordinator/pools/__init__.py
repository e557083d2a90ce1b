"""Rollout pool backends: local child processes, or a Kubernetes Deployment's scale subresource."""

from services.coordinator.pools.base import PoolError, RolloutPool


def build_pool(settings) -> RolloutPool:
    if settings.pool_backend == "kubernetes":
        from services.coordinator.pools.kubernetes import KubernetesPool

        return KubernetesPool(settings.k8s_namespace, settings.k8s_rollout_deployment, settings=settings)
    from services.coordinator.pools.local import LocalPool

    return LocalPool(settings.rollout_replicas, settings.log_dir)


__all__ = ["PoolError", "RolloutPool", "build_pool"]
