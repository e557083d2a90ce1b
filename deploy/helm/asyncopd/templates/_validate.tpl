{{/*
Checks that span several values (the per-key rules live in values.schema.json). Each failure names the
keys to change. Included from validate.yaml, so every render runs it.
*/}}
{{- define "asyncopd.validate" -}}
{{- $v := .Values -}}
{{- if and (not $v.redis.enabled) (not $v.externalRedis.url) }}
{{- fail "externalRedis.url is required when redis.enabled=false (e.g. redis://redis.example:6379/0; put the password in externalRedis.existingSecret)" }}
{{- end }}
{{- if contains "@" $v.externalRedis.url }}
{{- fail "externalRedis.url must not contain credentials (they would land in plain pod env): use a URL like redis://host:6379/0 and put the password in the Secret named by externalRedis.existingSecret" }}
{{- end }}
{{- if and $v.redis.enabled $v.externalRedis.url }}
{{- fail "externalRedis.url is set but redis.enabled=true: set redis.enabled=false to use the external Redis" }}
{{- end }}
{{- range $name := list "rollout" "teacher" "learner" }}
{{- $c := index $v $name }}
{{- if and $c.enabled (eq $c.config.device "cuda") (lt (int $c.gpus) 1) }}
{{- fail (printf "%s.config.device=cuda needs %s.gpus >= 1 (or set %s.config.device=cpu)" $name $name $name) }}
{{- end }}
{{- end }}
{{- range $name := list "rollout" "teacher" }}
{{- $c := index $v $name }}
{{- if and $c.enabled (eq $c.config.engine "hf") (gt (int $c.gpus) 1) }}
{{- fail (printf "%s.gpus=%d runs vLLM with tensor parallelism over the pod's GPUs, but %s.config.engine=hf serves on one device: set %s.config.engine=vllm or %s.gpus=1" $name (int $c.gpus) $name $name $name) }}
{{- end }}
{{- end }}
{{- range $name := list "rollout" "teacher" "learner" "coordinator" }}
{{- range (index $v $name).extraEnv }}
{{- if and (regexMatch "(?i)(password|passwd|secret|token|api_?key|credential)" .name) (hasKey . "value") }}
{{- fail (printf "%s.extraEnv %s carries a secret as a plain value: use valueFrom.secretKeyRef (or extraEnvFrom with a Secret)" $name .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- if ne $v.learner.config.weightsTransport $v.rollout.config.weightsTransport }}
{{- fail (printf "learner.config.weightsTransport=%s but rollout.config.weightsTransport=%s: rollout workers must follow the transport the learner publishes with, set both alike" $v.learner.config.weightsTransport $v.rollout.config.weightsTransport) }}
{{- end }}
{{- if eq $v.learner.config.weightsTransport "nccl" }}
{{- $l := $v.learner.config }}
{{- $r := $v.rollout.config }}
{{- if ne $l.weightsFallback $r.weightsFallback }}
{{- fail (printf "learner.config.weightsFallback=%s but rollout.config.weightsFallback=%s: with the nccl transport rollout workers load from the fallback the learner publishes every version through, set both alike" $l.weightsFallback $r.weightsFallback) }}
{{- end }}
{{- if ne (float64 $l.weightsTransferTimeoutS) (float64 $r.weightsTransferTimeoutS) }}
{{- fail (printf "learner.config.weightsTransferTimeoutS=%v but rollout.config.weightsTransferTimeoutS=%v: both sides bound the steps of the same nccl transfer round, set both alike" $l.weightsTransferTimeoutS $r.weightsTransferTimeoutS) }}
{{- end }}
{{- $port := int $l.weightsTransferPort }}
{{- range $key, $used := dict "learner.config.grpcPort" $l.grpcPort "learner.config.metricsPort" $l.metricsPort "learner.torchrun.rendezvousPort" $v.learner.torchrun.rendezvousPort }}
{{- if and (gt $port 0) (eq $port (int $used)) }}
{{- fail (printf "learner.config.weightsTransferPort=%d is also %s: the learner listens on both, choose another port" $port $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name := list "rollout" "teacher" }}
{{- $c := index $v $name }}
{{- if and $c.autoscaling.enabled (gt (int $c.autoscaling.minReplicas) (int $c.autoscaling.maxReplicas)) }}
{{- fail (printf "%s.autoscaling.minReplicas (%d) is greater than %s.autoscaling.maxReplicas (%d)" $name (int $c.autoscaling.minReplicas) $name (int $c.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if $v.rollout.keda.enabled }}
{{- if $v.rollout.autoscaling.enabled }}
{{- fail "rollout.keda.enabled and rollout.autoscaling.enabled are both true: KEDA creates its own HPA, enable only one" }}
{{- end }}
{{- if gt (int $v.rollout.keda.minReplicaCount) (int $v.rollout.keda.maxReplicaCount) }}
{{- fail (printf "rollout.keda.minReplicaCount (%d) is greater than rollout.keda.maxReplicaCount (%d)" (int $v.rollout.keda.minReplicaCount) (int $v.rollout.keda.maxReplicaCount)) }}
{{- end }}
{{- if not (include "asyncopd.hasAPI" (dict "ctx" $ "gv" "keda.sh/v1alpha1" "kind" "ScaledObject")) }}
{{- fail "rollout.keda.enabled=true but the cluster does not serve keda.sh/v1alpha1: install KEDA first (with `helm template`, pass --api-versions keda.sh/v1alpha1/ScaledObject)" }}
{{- end }}
{{- end }}
{{- if and $v.metrics.serviceMonitor.enabled $v.metrics.podMonitor.enabled }}
{{- fail "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled are both true: every pod would be scraped twice, enable only one" }}
{{- end }}
{{- range $name, $kind := dict "serviceMonitor" "ServiceMonitor" "podMonitor" "PodMonitor" "prometheusRule" "PrometheusRule" }}
{{- if and (index $v.metrics $name).enabled (not (include "asyncopd.hasAPI" (dict "ctx" $ "gv" "monitoring.coreos.com/v1" "kind" $kind))) }}
{{- fail (printf "metrics.%s.enabled=true but the cluster does not serve monitoring.coreos.com/v1 (Prometheus Operator CRDs): install them first (with `helm template`, pass --api-versions monitoring.coreos.com/v1/%s)" $name $kind) }}
{{- end }}
{{- end }}
{{- end }}
