{{/* Names ------------------------------------------------------------------------------------------ */}}

{{- define "asyncopd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "asyncopd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* <fullname>-<component>; args: dict "ctx" $ "component" "rollout" */}}
{{- define "asyncopd.componentName" -}}
{{- printf "%s-%s" (include "asyncopd.fullname" .ctx) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "asyncopd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels. Selectors use only the immutable ones: name, instance, component. ---------------------- */}}

{{/* args: dict "ctx" $ "component" "rollout" */}}
{{- define "asyncopd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "asyncopd.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* args: dict "ctx" $ "component" "rollout" */}}
{{- define "asyncopd.labels" -}}
helm.sh/chart: {{ include "asyncopd.chart" .ctx }}
{{ include "asyncopd.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: asyncopd
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Images -------------------------------------------------------------------------------------------- */}}

{{/* args: dict "ctx" $ "image" .Values.rollout.image */}}
{{- define "asyncopd.image" -}}
{{- if .image.digest -}}
{{ .image.repository }}@{{ .image.digest }}
{{- else -}}
{{ .image.repository }}:{{ .image.tag | default .ctx.Chart.AppVersion }}
{{- end -}}
{{- end }}

{{- define "asyncopd.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Redis connection ---------------------------------------------------------------------------------- */}}

{{- define "asyncopd.redis.host" -}}
{{- include "asyncopd.componentName" (dict "ctx" . "component" "redis") }}
{{- end }}

{{- define "asyncopd.redis.url" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "asyncopd.redis.host" . }}:{{ .Values.redis.port }}/{{ .Values.redis.database }}
{{- else -}}
{{ .Values.externalRedis.url }}
{{- end -}}
{{- end }}

{{/* host:port as KEDA (running in its own namespace) must dial it. */}}
{{- define "asyncopd.redis.address" -}}
{{- if .Values.redis.enabled -}}
{{ include "asyncopd.redis.host" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:{{ .Values.redis.port }}
{{- else -}}
{{- $u := urlParse .Values.externalRedis.url -}}
{{ if contains ":" $u.host }}{{ $u.host }}{{ else }}{{ $u.host }}:6379{{ end }}
{{- end -}}
{{- end }}

{{- define "asyncopd.redis.database" -}}
{{- if .Values.redis.enabled -}}
{{ .Values.redis.database }}
{{- else -}}
{{- $p := trimPrefix "/" (urlParse .Values.externalRedis.url).path -}}
{{ $p | default "0" }}
{{- end -}}
{{- end }}

{{- define "asyncopd.redis.tls" -}}
{{- if and (not .Values.redis.enabled) (hasPrefix "rediss://" .Values.externalRedis.url) }}true{{ else }}false{{ end }}
{{- end }}

{{/* Name of the Secret holding the Redis password, "" when there is none. */}}
{{- define "asyncopd.redis.secretName" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.auth.existingSecret }}{{ else }}{{ .Values.externalRedis.existingSecret }}{{ end }}
{{- end }}

{{- define "asyncopd.redis.secretKey" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.auth.existingSecretPasswordKey }}{{ else }}{{ .Values.externalRedis.existingSecretPasswordKey }}{{ end }}
{{- end }}

{{/* Environment shared by every service; args: dict "ctx" $ "config" .Values.rollout.config */}}
{{- define "asyncopd.commonEnv" -}}
{{- $ctx := .ctx -}}
- name: ASYNCOPD_REDIS_URL
  value: {{ include "asyncopd.redis.url" $ctx | quote }}
{{- with include "asyncopd.redis.secretName" $ctx }}
- name: ASYNCOPD_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "asyncopd.redis.secretKey" $ctx }}
{{- end }}
- name: ASYNCOPD_DATA_DIR
  value: {{ $ctx.Values.persistence.mountPath | quote }}
- name: ASYNCOPD_GRPC_HOST
  value: {{ .config.grpcHost | quote }}
- name: ASYNCOPD_GRPC_PORT
  value: {{ .config.grpcPort | quote }}
{{- with $ctx.Values.grpc.auth.existingSecret }}
{{- /* Drain (the only gRPC call that changes state) needs `authorization: Bearer <token>` metadata. */}}
- name: ASYNCOPD_GRPC_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $ctx.Values.grpc.auth.existingSecretKey }}
{{- end }}
{{- /* Advertised in the heartbeat: where `asyncopd status --services` and `asyncopd drain` call GetStatus/Drain. */}}
- name: ASYNCOPD_POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: ASYNCOPD_METRICS_HOST
  value: {{ .config.metricsHost | quote }}
- name: ASYNCOPD_METRICS_PORT
  value: {{ .config.metricsPort | quote }}
- name: ASYNCOPD_GRPC_REFLECTION
  value: {{ .config.grpcReflection | quote }}
- name: ASYNCOPD_LOG_LEVEL
  value: {{ .config.logLevel | quote }}
- name: ASYNCOPD_LOG_FORMAT
  value: {{ .config.logFormat | quote }}
- name: ASYNCOPD_POLL_INTERVAL_S
  value: {{ .config.pollIntervalS | quote }}
- name: ASYNCOPD_HEARTBEAT_TTL_S
  value: {{ .config.heartbeatTtlS | quote }}
- name: ASYNCOPD_REDIS_OUTAGE_S
  value: {{ .config.redisOutageS | quote }}
- name: HF_HOME
  value: {{ $ctx.Values.models.hfHome | quote }}
{{- if $ctx.Values.models.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- with $ctx.Values.models.hfTokenSecret.name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $ctx.Values.models.hfTokenSecret.key }}
{{- end }}
{{- end }}

{{/* The learner's fixed nccl weights-transfer port (learner.config.weightsTransferPort), "" when the transport
is not nccl or the port is 0 (a free one per round, which no container port or Service can declare). */}}
{{- define "asyncopd.weightsTransferPort" -}}
{{- $c := .Values.learner.config -}}
{{- if and (eq $c.weightsTransport "nccl") (gt (int $c.weightsTransferPort) 0) -}}
{{ int $c.weightsTransferPort }}
{{- end -}}
{{- end }}

{{/* Pod pieces ---------------------------------------------------------------------------------------- */}}

{{/* Scheduling and security of an asyncopd pod; args: dict "ctx" $ "c" .Values.rollout */}}
{{- define "asyncopd.podScheduling" -}}
{{- include "asyncopd.imagePullSecrets" .ctx }}
{{- with .c.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .c.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
terminationGracePeriodSeconds: {{ .c.terminationGracePeriodSeconds }}
{{- /* Only the coordinator with the kubernetes pool backend calls the Kubernetes API. */}}
{{- if and (eq .component "coordinator") (eq (.c.config.poolBackend | default "") "kubernetes") }}
automountServiceAccountToken: true
{{- else }}
automountServiceAccountToken: false
{{- end }}
{{- with .ctx.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* resources with the GPUs merged in; args: dict "c" .Values.rollout */}}
{{- define "asyncopd.resources" -}}
{{- $res := deepCopy (.c.resources | default dict) -}}
{{- if gt (int (.c.gpus | default 0)) 0 -}}
{{- $limits := deepCopy (get $res "limits" | default dict) -}}
{{- $requests := deepCopy (get $res "requests" | default dict) -}}
{{- $_ := set $limits .c.gpuResourceName (int .c.gpus) -}}
{{- $_ := set $requests .c.gpuResourceName (int .c.gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- $_ := set $res "requests" $requests -}}
{{- end -}}
{{- toYaml $res -}}
{{- end }}

{{/* Native gRPC probes on grpc.health.v1; args: dict "c" .Values.rollout "service" "asyncopd.v1.RolloutService" */}}
{{- define "asyncopd.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .c.config.grpcPort }}
    service: ""
  {{- toYaml .c.probes.startup | nindent 2 }}
livenessProbe:
  grpc:
    port: {{ .c.config.grpcPort }}
    service: ""
  {{- toYaml .c.probes.liveness | nindent 2 }}
readinessProbe:
  grpc:
    port: {{ .c.config.grpcPort }}
    service: {{ .service | quote }}
  {{- toYaml .c.probes.readiness | nindent 2 }}
{{- end }}

{{/* Volumes of an asyncopd pod: shared data, /dev/shm, extras; args: dict "ctx" $ "c" .Values.rollout */}}
{{- define "asyncopd.volumes" -}}
- name: data
{{- if .ctx.Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ .ctx.Values.persistence.existingClaim | default (include "asyncopd.componentName" (dict "ctx" .ctx "component" "data")) }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- /* The root filesystem is read-only: $HOME takes the caches (vLLM, Triton, torch extensions, CUDA). */}}
- name: home
  emptyDir: {}
{{- if .c.shmSize }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .c.shmSize }}
{{- end }}
{{- with .c.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "asyncopd.volumeMounts" -}}
- name: data
  mountPath: {{ .ctx.Values.persistence.mountPath }}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/asyncopd
{{- if .c.shmSize }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- with .c.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* PodDisruptionBudget; args: dict "ctx" $ "c" .Values.rollout "component" "rollout" */}}
{{- define "asyncopd.pdb" -}}
{{- if and .c.enabled .c.pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "asyncopd.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "asyncopd.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .c.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "asyncopd.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/* HorizontalPodAutoscaler; args: dict "ctx" $ "c" .Values.rollout "component" "rollout" */}}
{{- define "asyncopd.hpa" -}}
{{- if and .c.enabled .c.autoscaling.enabled }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "asyncopd.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "asyncopd.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "asyncopd.componentName" . }}
  minReplicas: {{ .c.autoscaling.minReplicas }}
  maxReplicas: {{ .c.autoscaling.maxReplicas }}
  {{- with .c.autoscaling.metrics }}
  metrics:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* ServiceAccount the coordinator runs as. */}}
{{- define "asyncopd.coordinator.serviceAccountName" -}}
{{- if .Values.coordinator.serviceAccount.create -}}
{{ .Values.coordinator.serviceAccount.name | default (include "asyncopd.componentName" (dict "ctx" . "component" "coordinator")) }}
{{- else -}}
{{ .Values.coordinator.serviceAccount.name | default "default" }}
{{- end -}}
{{- end }}

{{/* True when the cluster serves an API (a real cluster lists group/version and group/version/Kind;
`helm template --api-versions` passes either). args: dict "ctx" $ "gv" "keda.sh/v1alpha1" "kind" "ScaledObject" */}}
{{- define "asyncopd.hasAPI" -}}
{{- if or (.ctx.Capabilities.APIVersions.Has .gv) (.ctx.Capabilities.APIVersions.Has (printf "%s/%s" .gv .kind)) }}true{{ end }}
{{- end }}

{{/* storageClassName of a persistence block: "" = cluster default (omitted), "-" = explicitly none. */}}
{{- define "asyncopd.storageClass" -}}
{{- if eq .storageClass "-" }}
storageClassName: ""
{{- else if .storageClass }}
storageClassName: {{ .storageClass | quote }}
{{- end }}
{{- end }}
