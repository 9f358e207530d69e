{{/* Common names and labels of the r3map-csi chart. */}}
{{- define "r3map-csi.fullname" -}}
{{- printf "%s" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "r3map-csi.labels" -}}
app.kubernetes.io/name: r3map-csi
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "r3map-csi.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Whether the chart runs the region service itself. */}}
{{- define "r3map-csi.embedded" -}}
{{- if not .Values.regionService.external.address }}true{{ end -}}
{{- end -}}

{{/* Name of the embedded region service's Service. */}}
{{- define "r3map-csi.regionsName" -}}
{{ include "r3map-csi.fullname" . }}-regions
{{- end -}}

{{/* The region service's DNS names (the server certificate's SANs). */}}
{{- define "r3map-csi.regionsDNS" -}}
{{- $svc := include "r3map-csi.regionsName" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) | toJson -}}
{{- end -}}

{{/* HOST:PORT the plugins dial. */}}
{{- define "r3map-csi.regionAddress" -}}
{{- if .Values.regionService.external.address -}}
{{ .Values.regionService.external.address }}
{{- else -}}
{{ include "r3map-csi.regionsName" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:{{ .Values.regionService.port }}
{{- end -}}
{{- end -}}

{{/* Secret names of the certificates: given, or the generated ones. */}}
{{- define "r3map-csi.regionServerSecret" -}}
{{ .Values.certificates.regionServerSecret | default (printf "%s-region-server" (include "r3map-csi.fullname" .)) }}
{{- end -}}
{{- define "r3map-csi.regionClientSecret" -}}
{{- if .Values.regionService.external.address -}}
{{ required "regionService.external.secretName is required with regionService.external.address (an unauthenticated region service is refused)" .Values.regionService.external.secretName }}
{{- else -}}
{{ .Values.certificates.regionClientSecret | default (printf "%s-region-client" (include "r3map-csi.fullname" .)) }}
{{- end -}}
{{- end -}}
{{- define "r3map-csi.migrationSecret" -}}
{{ .Values.certificates.migrationSecret | default (printf "%s-migration" (include "r3map-csi.fullname" .)) }}
{{- end -}}

{{/* Flags of both plugins towards the region service. */}}
{{- define "r3map-csi.regionFlags" -}}
- --region-service={{ include "r3map-csi.regionAddress" . }}
{{- $ext := .Values.regionService.external }}
{{- if or (not $ext.address) $ext.tls }}
- --ca=/etc/r3map-csi/region/ca.crt
- --cert=/etc/r3map-csi/region/tls.crt
- --key=/etc/r3map-csi/region/tls.key
{{- with $ext.tlsServerName }}
- --tls-name={{ . }}
{{- end }}
{{- end }}
{{- if and $ext.address $ext.token }}
- --token-file=/etc/r3map-csi/region/token
{{- end }}
{{- end -}}

{{/* Flags of both plugins for the node-to-node migration RPC. */}}
{{- define "r3map-csi.migrationFlags" -}}
- --migration-ca=/etc/r3map-csi/migration/ca.crt
- --migration-cert=/etc/r3map-csi/migration/tls.crt
- --migration-key=/etc/r3map-csi/migration/tls.key
- --migration-tls-name=r3map-node
{{- end -}}

{{/* Prometheus discovery annotations of a pod. */}}
{{- define "r3map-csi.metricsAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* Security context of the containers that need no privilege. */}}
{{- define "r3map-csi.restricted" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}
