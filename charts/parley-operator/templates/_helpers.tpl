{{- define "parley-operator.name" -}}parley-operator{{- end -}}

{{- define "parley-operator.labels" -}}
app.kubernetes.io/name: parley-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: parley
{{- end -}}

{{- define "parley-operator.selector" -}}
app.kubernetes.io/name: parley-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "parley-operator.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* What the operator may do with the objects it manages. */}}
{{- define "parley-operator.rules" -}}
- apiGroups: ["parley.dev"]
  resources: ["chatclusters"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["parley.dev"]
  resources: ["chatclusters/status"]
  verbs: ["get", "patch"]
# Deployments: also deleted, the push senders' when spec.push goes.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Services: also deleted, the per-pod ones of gateways that are gone
# (spec.gateway.publish.mode PodService).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Gateway pods: read, mark the one to go first, delete one the Deployment kept.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "patch", "delete"]
# Backend URLs given as secretRef (Redis, for the routing table).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
