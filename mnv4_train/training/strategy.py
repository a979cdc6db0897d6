"""The tf.distribute strategy of a run, and this process's place in it."""

from __future__ import annotations

import os

import tensorflow as tf

from mnv4_train.errors import ConfigError

DISTRIBUTIONS = ("cpu", "gpu", "multiworker", "tpu")


def make_strategy(distribution: str, tpu: str = "local", cpu_replicas: int = 1):
  """The tf.distribute strategy for `distribution`; one clear error when it cannot be had."""
  if distribution not in DISTRIBUTIONS:
    raise ConfigError(f"runtime.distribution must be one of {list(DISTRIBUTIONS)}, "
                      f"not {distribution!r}")
  if distribution == "cpu":
    if cpu_replicas > 1:  # N logical CPUs: N replicas on one host, as N GPUs would be
      cpu = tf.config.list_physical_devices("CPU")[0]
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
      return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(cpu_replicas)])
    return tf.distribute.OneDeviceStrategy("/cpu:0")
  if distribution == "gpu":
    if not tf.config.list_physical_devices("GPU"):
      raise ConfigError("runtime.distribution='gpu' but TensorFlow sees no GPU; install "
                        "tensorflow[and-cuda] or use runtime.distribution='cpu'")
    return tf.distribute.MirroredStrategy()
  if distribution == "multiworker":
    if not os.environ.get("TF_CONFIG"):
      raise ConfigError("runtime.distribution='multiworker' needs TF_CONFIG (cluster and task) in "
                        "the environment of every worker; see launch/gpu_cluster.py")
    return tf.distribute.MultiWorkerMirroredStrategy()
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)


def host_info(strategy):
  """(host index, number of hosts, local replicas) of this process."""
  local = len(strategy.extended.worker_devices)
  hosts = max(1, strategy.num_replicas_in_sync // local)
  resolver = getattr(strategy, "cluster_resolver", None)
  host = int(getattr(resolver, "task_id", 0) or 0) if hosts > 1 else 0
  return host, hosts, local
