{{/* The chart's name, or nameOverride. */}}
{{- define "kube-lock-manager.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name, used for every object (cluster-scoped ones too, so
that two releases never share a ClusterRole). Truncated to 63 characters, the
DNS label limit of Service names.
*/}}
{{- define "kube-lock-manager.fullname" -}}
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

{{- define "kube-lock-manager.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "kube-lock-manager.labels" -}}
helm.sh/chart: {{ include "kube-lock-manager.chart" . }}
{{ include "kube-lock-manager.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kube-lock-manager
{{- end }}

{{/* Labels that select the operator's Pods; never change them (Deployment selectors are immutable). */}}
{{- define "kube-lock-manager.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kube-lock-manager.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kube-lock-manager.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kube-lock-manager.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kube-lock-manager.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "kube-lock-manager.leaseName" -}}
{{- default (include "kube-lock-manager.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/* Where the CA bundle is mounted, and the file the operator reads. */}}
{{- define "kube-lock-manager.caDir" -}}/etc/kube-lock-manager/ca{{- end }}

{{/*
Combinations the schema cannot express; rendering fails with a message that
names the values to change.
*/}}
{{- define "kube-lock-manager.validate" -}}
{{- if and .Values.elasticsearch.ca.secretName .Values.elasticsearch.ca.configMapName }}
{{- fail "elasticsearch.ca: set secretName or configMapName, not both" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled=true: without it every replica would reconcile" }}
{{- end }}
{{- with .Values.elasticsearch.auth }}
{{- if and .existingSecret (not .apiKeyKey) (not (and .usernameKey .passwordKey)) }}
{{- fail "elasticsearch.auth: with existingSecret, set apiKeyKey, or both usernameKey and passwordKey" }}
{{- end }}
{{- end }}
{{- end }}

{{/* --http-addr: http.address and http.port (IPv6 addresses in brackets). */}}
{{- define "kube-lock-manager.httpAddr" -}}
{{- $a := .Values.http.address -}}
{{- if contains ":" $a -}}
[{{ trimPrefix "[" (trimSuffix "]" $a) }}]:{{ .Values.http.port }}
{{- else -}}
{{ $a }}:{{ .Values.http.port }}
{{- end -}}
{{- end }}

{{/* The Pod's dnsPolicy: dnsPolicy, else ClusterFirstWithHostNet with hostNetwork. */}}
{{- define "kube-lock-manager.dnsPolicy" -}}
{{- if .Values.dnsPolicy -}}
{{ .Values.dnsPolicy }}
{{- else if .Values.hostNetwork -}}
ClusterFirstWithHostNet
{{- end -}}
{{- end }}
