{{/* The chart's name, and the full name resources are called by. */}}
{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: router, ray-head, prefill, decode, redis. */}}
{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "pdserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "pdserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pdserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.rayAuthSecret" -}}
{{- default (printf "%s-ray-auth" (include "pdserve.fullname" .)) .Values.rayAuth.existingSecret -}}
{{- end -}}

{{- define "pdserve.redisSecret" -}}
{{- default (printf "%s-redis" (include "pdserve.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/* Whether Redis has a password: the bundled one always; an external one with a Secret. */}}
{{- define "pdserve.redisHasPassword" -}}
{{- if or .Values.redis.enabled .Values.redis.auth.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "pdserve.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "pdserve.fullname" . }}-redis:{{ .Values.redis.port }}/0
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* The Ray head's GCS address, host:port. */}}
{{- define "pdserve.rayHeadAddress" -}}
{{- if .Values.ray.kuberay.enabled -}}
{{ include "pdserve.fullname" . }}-ray-head-svc:{{ .Values.ray.gcsPort }}
{{- else -}}
{{ include "pdserve.fullname" . }}-ray-head:{{ .Values.ray.gcsPort }}
{{- end -}}
{{- end -}}

{{/* Environment of every Ray process: token auth, the pod's address, the cluster's Redis. */}}
{{- define "pdserve.clusterEnv" -}}
- name: POD_IP
  valueFrom:
    fieldRef: {fieldPath: status.podIP}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "pdserve.rayAuthSecret" . }}
      key: {{ .Values.rayAuth.tokenKey }}
- name: RAY_HEAD_ADDRESS
  value: {{ include "pdserve.rayHeadAddress" . | quote }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: PDSERVE_REDIS_URL
  value: {{ include "pdserve.redisUrl" . | quote }}
{{- if include "pdserve.redisHasPassword" . }}
- name: PDSERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "pdserve.redisSecret" . }}
      key: {{ .Values.redis.auth.passwordKey }}
{{- end }}
{{- end -}}

{{/* Workers one pod of a pool hosts: one per GPU, one when it has none. */}}
{{- define "pdserve.unitsPerPod" -}}
{{- max 1 (int .gpusPerPod) -}}
{{- end -}}

{{- define "pdserve.poolWorkers" -}}
{{- mul (int .replicas) (max 1 (int .gpusPerPod)) -}}
{{- end -}}

{{- define "pdserve.modelVolumeMount" -}}
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "pdserve.modelVolume" -}}
{{- if .Values.model.volume }}
- name: model
{{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "pdserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{/*
The pod of one pool's worker: a Ray node that advertises the pool's resource and blocks.
Called with (dict "root" $ "role" "prefill" "pool" .Values.prefill).
*/}}
{{- define "pdserve.workerPodSpec" -}}
{{- $root := .root -}}
{{- $pool := .pool -}}
{{- $units := include "pdserve.unitsPerPod" $pool -}}
serviceAccountName: {{ include "pdserve.serviceAccountName" $root }}
automountServiceAccountToken: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
securityContext: {{- include "pdserve.podSecurityContext" $root | nindent 2 }}
terminationGracePeriodSeconds: 60
containers:
  - name: ray-worker
    image: {{ include "pdserve.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    {{- if .kuberay }}
    # KubeRay's operator writes the `ray start` command from the group's rayStartParams.
    ports:
      - {name: metrics, containerPort: 8080}
    {{- else }}
    command:
      - ray
      - start
      - --block
      - --address=$(RAY_HEAD_ADDRESS)
      - --node-ip-address=$(POD_IP)
      - --num-cpus={{ $units }}
      - --num-gpus={{ int $pool.gpusPerPod }}
      - {{ printf "--resources={\"%s\": %s}" .role $units | quote }}
      - --disable-usage-stats
    {{- end }}
    env:
      {{- include "pdserve.clusterEnv" $root | nindent 6 }}
      {{- with $pool.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    resources:
      requests:
        {{- with $pool.resources.requests }}{{ toYaml . | nindent 8 }}{{- end }}
        {{- if gt (int $pool.gpusPerPod) 0 }}
        nvidia.com/gpu: {{ int $pool.gpusPerPod }}
        {{- end }}
        {{- if $pool.rdma.enabled }}
        {{ $pool.rdma.resourceName }}: {{ int $pool.rdma.count }}
        {{- end }}
      limits:
        {{- with $pool.resources.limits }}{{ toYaml . | nindent 8 }}{{- end }}
        {{- if gt (int $pool.gpusPerPod) 0 }}
        nvidia.com/gpu: {{ int $pool.gpusPerPod }}
        {{- end }}
        {{- if $pool.rdma.enabled }}
        {{ $pool.rdma.resourceName }}: {{ int $pool.rdma.count }}
        {{- end }}
    securityContext:
      allowPrivilegeEscalation: false
      capabilities:
        drop: [ALL]
        {{- if $pool.rdma.enabled }}
        add: [IPC_LOCK]
        {{- end }}
    # No liveness probe: `ray start --block` exits when any of the node's Ray processes dies,
    # and the container restarts.
    lifecycle:
      preStop:
        exec:
          command: [ray, stop]  # the node leaves the cluster before the pod goes
    {{- if or $pool.shm.enabled $root.Values.model.volume }}
    volumeMounts:
      {{- if $pool.shm.enabled }}
      - name: dshm
        mountPath: /dev/shm
      {{- end }}
      {{- include "pdserve.modelVolumeMount" $root | nindent 6 }}
    {{- end }}
{{- if or $pool.shm.enabled $root.Values.model.volume }}
volumes:
  {{- if $pool.shm.enabled }}
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $pool.shm.sizeLimit }}
  {{- end }}
  {{- include "pdserve.modelVolume" $root | nindent 2 }}
{{- end }}
{{- with $pool.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
