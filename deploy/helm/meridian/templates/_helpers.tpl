{{/* Full name of the release's objects. */}}
{{- define "meridian.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "meridian.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
meridian.dev/region: {{ .Values.region | quote }}
{{- end -}}

{{/* Labels that select the release's pods. */}}
{{- define "meridian.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Name of the CloudNativePG cluster of this region. */}}
{{- define "meridian.pgCluster" -}}
{{- printf "%s-pg" (include "meridian.fullname" .) | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{/* Secret and key holding the region's postgres:// URL. */}}
{{- define "meridian.dbSecret" -}}
{{- if .Values.postgres.existingSecret -}}
{{- .Values.postgres.existingSecret -}}
{{- else -}}
{{- printf "%s-app" (include "meridian.pgCluster" .) -}}
{{- end -}}
{{- end -}}
{{- define "meridian.dbSecretKey" -}}
{{- if .Values.postgres.existingSecret -}}
{{- .Values.postgres.existingSecretKey -}}
{{- else -}}
uri
{{- end -}}
{{- end -}}

{{/* Checks values the JSON schema cannot relate to each other. */}}
{{- define "meridian.check" -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int .Values.drainTimeoutSeconds) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be above drainTimeoutSeconds (%v): Kubernetes would kill the pod while it drains" .Values.terminationGracePeriodSeconds .Values.drainTimeoutSeconds) -}}
{{- end -}}
{{- if and (not .Values.postgres.cnpg.enabled) (not .Values.postgres.existingSecret) -}}
{{- fail "postgres: enable postgres.cnpg or name postgres.existingSecret: every node of a region needs the region's event log" -}}
{{- end -}}
{{- if and (eq .Values.media.publicIPFrom "static") (not .Values.media.publicIP) -}}
{{- fail "media.publicIP is required when media.publicIPFrom is static" -}}
{{- end -}}
{{- if lt (int .Values.lease.ttlMs) (mul 2 (int .Values.lease.periodMs)) -}}
{{- fail "lease.ttlMs must be at least twice lease.periodMs" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- end -}}
