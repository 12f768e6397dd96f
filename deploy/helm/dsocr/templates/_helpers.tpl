{{/* The chart's name, or nameOverride. */}}
{{- define "dsocr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource names: the release name, with the chart's name added unless the release already holds it. */}}
{{- define "dsocr.fullname" -}}
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

{{- define "dsocr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dsocr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dsocr.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dsocr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret holding APP_API_KEYS: one you manage (auth.existingSecret), else the chart's own. */}}
{{- define "dsocr.secretName" -}}
{{- default (include "dsocr.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{/*
"true" when callers need a key: API keys (auth.apiKeys or auth.existingSecret) or a tenants file
(tenants.existingSecret, APP_TENANTS_FILE); empty when the API is open to anyone who reaches it.
*/}}
{{- define "dsocr.authConfigured" -}}
{{- if or .Values.auth.apiKeys .Values.auth.existingSecret .Values.tenants.existingSecret }}true{{ end }}
{{- end }}

{{/*
Where every pod mounts tenants.existingSecret (a directory, never a subPath: the kubelet updates a
mounted Secret in place by swapping the directory's ..data link, which a subPath mount never sees)
and the file in it that APP_TENANTS_FILE names.
*/}}
{{- define "dsocr.tenantsDir" -}}/etc/dsocr/tenants{{- end }}
{{- define "dsocr.tenantsFile" -}}tenants.yaml{{- end }}

{{/* The claim behind /data: one you manage (persistence.existingClaim), else the chart's own. */}}
{{- define "dsocr.claimName" -}}
{{- default (include "dsocr.fullname" .) .Values.persistence.existingClaim }}
{{- end }}

{{/*
Scale-out (scaleOut.enabled): the API and worker pods carry app.kubernetes.io/component on top of
the selector labels, so that each Deployment and Service selects its own pods. Without scale-out the
selector stays as it was: a Deployment's selector cannot change in an upgrade.
*/}}
{{- define "dsocr.componentSelectorLabels" -}}
{{ include "dsocr.selectorLabels" .root }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/*
The image tag of a pod: api.image.tag for the API replicas, else image.tag, else the flavour the
values need among the tags .github/workflows/docker.yml pushes (tests/test_deploy.py reads them from
the workflow): vllm where vLLM runs in the pod, gpu for the hf backend on a GPU, latest (the CPU
image) for the rest, the API replicas and the clients of a vLLM server included. Arguments: root
(the chart's context) and api (true for the API replicas of scale-out).
*/}}
{{- define "dsocr.imageTag" -}}
{{- $values := .root.Values }}
{{- $settings := $values.settings }}
{{- if and .api $values.api.image.tag }}
{{- $values.api.image.tag }}
{{- else if $values.image.tag }}
{{- $values.image.tag }}
{{- else if and (not .api) (eq $settings.backend "vllm") (not $settings.vllmUrl) }}
{{- "vllm" }}
{{- else if and (not .api) (eq $settings.backend "hf") (gt (int $values.gpu) 0) }}
{{- "gpu" }}
{{- else }}
{{- "latest" }}
{{- end }}
{{- end }}

{{/*
image.pullPolicy, else Always for the workflow's moving tags (each push to main moves latest, gpu
and vllm, and IfNotPresent would keep whichever build a node pulled first) and IfNotPresent for any
other tag (<flavour>-<sha> names one build; a local tag such as cpu is never in a registry).
Arguments: those of dsocr.imageTag.
*/}}
{{- define "dsocr.imagePullPolicy" -}}
{{- $moving := has (include "dsocr.imageTag" .) (list "latest" "gpu" "vllm") }}
{{- .root.Values.image.pullPolicy | default (ternary "Always" "IfNotPresent" $moving) }}
{{- end }}

{{/*
The Secret and key APP_LINK_SECRET comes from: secretSettings.linkSecret, else in scale-out the
chart's own <fullname>-link (secret-link.yaml), else nothing (a random key per process).
*/}}
{{- define "dsocr.linkSecretRef" -}}
{{- $linkSecret := .Values.secretSettings.linkSecret }}
{{- if $linkSecret.name }}
{{- toJson $linkSecret }}
{{- else if .Values.scaleOut.enabled }}
{{- toJson (dict "name" (printf "%s-link" (include "dsocr.fullname" .)) "key" "link-secret") }}
{{- else }}
{{- toJson dict }}
{{- end }}
{{- end }}

{{/* The claim behind HF_HOME with modelCache.enabled: one you manage, else the chart's own. */}}
{{- define "dsocr.modelCacheClaimName" -}}
{{- default (printf "%s-model-cache" (include "dsocr.fullname" .)) .Values.modelCache.existingClaim }}
{{- end }}

{{/* Refuse values that leave the pods without an image to pull. */}}
{{- define "dsocr.validateImage" -}}
{{- if not .Values.image.repository }}
{{- fail "image.repository is empty: set it to ghcr.io/<owner>/dsocr-server, where .github/workflows/docker.yml pushes the images (or to your own registry's copy)" }}
{{- end }}
{{- end }}

{{/* Lists as long as the tasks waiting and the tasks held by workers (app.tasks.redis_queue). */}}
{{- define "dsocr.queueWaitingList" -}}dsocr:count:waiting{{- end }}
{{- define "dsocr.queueHeldList" -}}dsocr:count:held{{- end }}

{{/* Refuse scale-out values that cannot work, with the value to set, before anything is applied. */}}
{{- define "dsocr.validateScaleOut" -}}
{{- if .Values.scaleOut.enabled }}
{{- if not (or .Values.redis.url .Values.redis.existingSecret) }}
{{- fail "scaleOut.enabled needs Redis: set redis.url (redis://host:6379/0) or redis.existingSecret" }}
{{- end }}
{{- if not .Values.settings.s3Bucket }}
{{- fail "scaleOut.enabled needs an S3 bucket for tasks and results: set settings.s3Bucket (and settings.s3EndpointUrl, the keys, for a store other than AWS)" }}
{{- end }}
{{- $autoscaling := .Values.worker.autoscaling }}
{{- if and $autoscaling.keda.enabled $autoscaling.hpa.enabled }}
{{- fail "worker.autoscaling: enable keda or hpa, not both (KEDA makes its own HorizontalPodAutoscaler)" }}
{{- end }}
{{- if gt (int $autoscaling.minReplicas) (int $autoscaling.maxReplicas) }}
{{- fail "worker.autoscaling.minReplicas is above worker.autoscaling.maxReplicas" }}
{{- end }}
{{- if and $autoscaling.hpa.enabled (lt (int $autoscaling.minReplicas) 1) }}
{{- fail "worker.autoscaling.hpa needs minReplicas of 1 or more; scaling to zero takes KEDA (worker.autoscaling.keda)" }}
{{- end }}
{{- if and $autoscaling.keda.enabled (not $autoscaling.keda.redisAddress) }}
{{- if .Values.redis.existingSecret }}
{{- fail "worker.autoscaling.keda with redis.existingSecret needs worker.autoscaling.keda.redisAddress (host:port): the chart cannot read the Secret" }}
{{- end }}
{{- if and (urlParse .Values.redis.url).userinfo (not $autoscaling.keda.authenticationRef) }}
{{- fail "redis.url carries credentials: KEDA reads them from a TriggerAuthentication, set worker.autoscaling.keda.authenticationRef" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The pod template of a Deployment. Arguments: root (the chart's context), component ("" for the
single Deployment, else api or worker) and role (the APP_ROLE the chart sets in scale-out).
Without scale-out it renders the one pod as it always has: /data on the claim, the GPU, every
setting. In scale-out the records and results live in Redis and S3, so /data is scratch (an
emptyDir); the API pods take their image, resources and placement from api.*, and only the
workers get the GPU.
*/}}
{{- define "dsocr.podTemplate" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- $api := eq .component "api" }}
{{- $gpu := and (not $api) $values.gpu }}
{{- $modelCache := and (not $api) $values.modelCache.enabled -}}
metadata:
  labels:
    {{- include "dsocr.componentSelectorLabels" . | nindent 4 }}
    {{- with $values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- if and $values.auth.apiKeys (not $values.auth.existingSecret) }}
    # Restart the pod when the chart's keys change: the service reads them at start-up.
    checksum/secret: {{ include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum }}
    {{- end }}
    {{- with $values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with $values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if not $api }}
  {{- with $values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- end }}
  # The service never talks to the Kubernetes API.
  automountServiceAccountToken: false
  securityContext:
    {{- toYaml $values.podSecurityContext | nindent 4 }}
  # On SIGTERM the service gives a running task 20 s to reach a page boundary.
  terminationGracePeriodSeconds: 30
  containers:
    - name: dsocr
      {{- $image := dict "root" $root "api" $api }}
      image: "{{ ternary $values.api.image.repository "" $api | default $values.image.repository }}:{{ include "dsocr.imageTag" $image }}"
      imagePullPolicy: {{ include "dsocr.imagePullPolicy" $image }}
      securityContext:
        {{- toYaml $values.securityContext | nindent 8 }}
      ports:
        - name: http
          containerPort: 8000
          protocol: TCP
      env:
        # Set by the chart: the port above, the volume below and the Secret.
        - name: APP_HOST
          value: "0.0.0.0"
        - name: APP_PORT
          value: "8000"
        - name: APP_DATA_DIR
          value: /data
        {{- if $modelCache }}
        # The weights on modelCache's claim instead of under /data (the images' HF_HOME).
        - name: HF_HOME
          value: /models
        {{- end }}
        {{- if $values.tenants.existingSecret }}
        # Read again every settings.tenantsPollSeconds: keys added to the Secret work with no restart.
        - name: APP_TENANTS_FILE
          value: {{ printf "%s/%s" (include "dsocr.tenantsDir" $root) (include "dsocr.tenantsFile" $root) | quote }}
        {{- end }}
        {{- if or $values.auth.apiKeys $values.auth.existingSecret }}
        - name: APP_API_KEYS
          valueFrom:
            secretKeyRef:
              name: {{ include "dsocr.secretName" $root }}
              key: {{ $values.auth.secretKey }}
        {{- end }}
        {{- if .role }}
        # Scale-out: this pod's part, and the Redis queue and S3 bucket every pod shares.
        - name: APP_ROLE
          value: {{ .role }}
        - name: APP_QUEUE_BACKEND
          value: redis
        - name: APP_STORAGE_BACKEND
          value: s3
        - name: APP_REDIS_URL
          {{- if $values.redis.existingSecret }}
          valueFrom:
            secretKeyRef:
              name: {{ $values.redis.existingSecret }}
              key: {{ $values.redis.secretKey }}
          {{- else }}
          value: {{ $values.redis.url | quote }}
          {{- end }}
        {{- end }}
        {{- range $key, $value := $values.settings }}
        {{- if not (and (kindIs "string" $value) (eq $value "")) }}
        - name: {{ printf "APP_%s" ($key | snakecase | upper) }}
          {{- /* toJson keeps numbers out of Go's exponent notation (40000000, not 4e+07). */}}
          value: {{ if kindIs "string" $value }}{{ $value | quote }}{{ else }}{{ toJson $value | quote }}{{ end }}
        {{- end }}
        {{- end }}
        {{- range $key, $secret := $values.secretSettings }}
        {{- /* Every process must sign share links with one key: scale-out keeps one if none is named. */}}
        {{- if eq $key "linkSecret" }}
        {{- $secret = include "dsocr.linkSecretRef" $root | fromJson }}
        {{- end }}
        {{- if $secret.name }}
        - name: {{ printf "APP_%s" ($key | snakecase | upper) }}
          valueFrom:
            secretKeyRef:
              name: {{ $secret.name }}
              key: {{ $secret.key }}
        {{- end }}
        {{- end }}
        {{- with $values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 6
      # /readyz fails when a worker died or /data is not writable.
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      resources:
        {{- $resources := deepCopy (ternary $values.api.resources $values.resources $api) }}
        {{- if $gpu }}
        {{- $limits := get $resources "limits" | default dict }}
        {{- $_ := set $limits "nvidia.com/gpu" $values.gpu }}
        {{- $_ := set $resources "limits" $limits }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: /data
        {{- if $modelCache }}
        - name: model-cache
          mountPath: /models
        {{- end }}
        {{- if $values.tenants.existingSecret }}
        - name: tenants
          mountPath: {{ include "dsocr.tenantsDir" $root }}
          readOnly: true
        {{- end }}
  volumes:
    - name: data
      {{- if and $values.persistence.enabled (not .component) }}
      persistentVolumeClaim:
        claimName: {{ include "dsocr.claimName" $root }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- if $modelCache }}
    - name: model-cache
      persistentVolumeClaim:
        claimName: {{ include "dsocr.modelCacheClaimName" $root }}
    {{- end }}
    {{- if $values.tenants.existingSecret }}
    - name: tenants
      secret:
        secretName: {{ $values.tenants.existingSecret }}
        items:
          - key: {{ $values.tenants.secretKey }}
            path: {{ include "dsocr.tenantsFile" $root }}
        # 0440 (288): read by root and the pod's fsGroup, which the kubelet makes the files' group and
        # every container process's supplementary group; without podSecurityContext.fsGroup, 0444 (292).
        defaultMode: {{ ternary 288 292 (hasKey $values.podSecurityContext "fsGroup") }}
    {{- end }}
  {{- with (ternary $values.api.nodeSelector $values.nodeSelector $api) }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (ternary $values.api.affinity $values.affinity $api) }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (ternary $values.api.tolerations $values.tolerations $api) }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
