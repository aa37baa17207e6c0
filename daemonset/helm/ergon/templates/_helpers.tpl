{{/* Names and labels shared by every object of the chart. */}}

{{- define "ergon.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ergon.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "ergon.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "ergon.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Cluster-scoped objects: the release's namespace and full name. */}}
{{- define "ergon.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "ergon.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ergon.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ergon.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ergon.labels" -}}
{{ include "ergon.selectorLabels" . }}
app.kubernetes.io/component: exporter
app.kubernetes.io/part-of: ergon
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "ergon.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ergon.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ergon.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
