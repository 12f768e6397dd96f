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

{{/* The claim behind /data: one you manage (persistence.existingClaim), else the chart's own. */}}
{{- define "dsocr.claimName" -}}
{{- default (include "dsocr.fullname" .) .Values.persistence.existingClaim }}
{{- end }}
