{{- define "vmrw.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vmrw.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vmrw.labels" -}}
{{ include "vmrw.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- if .Values.excludeFromBackup }}
velero.io/exclude-from-backup: "true"
{{- end }}
{{- end -}}

{{- define "vmrw.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vmrw.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "vmrw.tlsSecretName" -}}
{{- if eq .Values.certificates.mode "provided" -}}
{{- required "certificates.provided.secretName is required with certificates.mode=provided" .Values.certificates.provided.secretName -}}
{{- else -}}
{{- printf "%s-tls" (include "vmrw.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "vmrw.serviceHost" -}}
{{- printf "%s.%s.svc" (include "vmrw.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* The Helm-generated CA and certificate, made once per render. */}}
{{- define "vmrw.helmCerts" -}}
{{- $fullname := include "vmrw.fullname" . -}}
{{- $host := include "vmrw.serviceHost" . -}}
{{- $ca := genCA (printf "%s-ca" $fullname) (int .Values.certificates.helm.validityDays) -}}
{{- $cert := genSignedCert $host nil (list $host (printf "%s.%s" $fullname .Release.Namespace) $fullname (printf "%s.cluster.local" $host)) (int .Values.certificates.helm.validityDays) $ca -}}
{{- dict "ca" ($ca.Cert | b64enc) "crt" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc) | toJson -}}
{{- end -}}
