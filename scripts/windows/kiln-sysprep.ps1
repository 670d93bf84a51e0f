# kiln's generalization step for Windows: AIB's default deprovisioning, with the local
# divergences documented in docs/windows.md.
#
# - c:\DeprovisioningScript.ps1, when a customizer wrote one, runs instead (as on AIB; its
#   contents are printed first). kiln's own traces are removed around it all the same: the
#   cached answer files (they hold kiln's per-build password) before it, and the build account
#   is disabled after it when the script returns (it may itself shut the VM down).
# - The Azure agent services (RdAgent, WindowsAzureTelemetryService, WindowsAzureGuestAgent) are
#   waited for only when they exist, and only up to ServiceWaitMinutes: under QEMU there is no
#   Azure fabric, so they may be absent or never start. Each skip is logged.
# - The ImageState poll has a deadline and reports the state it stuck in (AIB loops until the
#   build times out on IMAGE_STATE_UNDEPLOYABLE / IMAGE_STATE_COMPLETE).
param(
    [string]$BuildUser = 'packer',
    [int]$ServiceWaitMinutes = 5,
    [int]$ImageStateMinutes = 30
)
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$override = 'c:\DeprovisioningScript.ps1'

function Remove-AnswerFiles {
    foreach ($f in "$env:SystemRoot\system32\Sysprep\unattend.xml", "$env:SystemRoot\Panther\unattend.xml", "$env:SystemRoot\Panther\Unattend\unattend.xml") {
        if (Test-Path -LiteralPath $f) { Remove-Item -LiteralPath $f -Force; Write-Output ">>> removed $f" }
    }
}
function Disable-BuildUser {
    # The build account keeps no usable credential in the image.
    if (Get-LocalUser -Name $BuildUser -ErrorAction SilentlyContinue) {
        Disable-LocalUser -Name $BuildUser
        Write-Output ">>> kiln: build account $BuildUser disabled"
    }
}

if (Test-Path -LiteralPath $override) {
    Remove-AnswerFiles
    Write-Output ">>> Running the deprovisioning script $override :"
    Get-Content -LiteralPath $override | ForEach-Object { Write-Output "    $_" }
    & $override
    $code = $LASTEXITCODE
    Disable-BuildUser
    exit $code
}

foreach ($svcName in 'RdAgent', 'WindowsAzureTelemetryService', 'WindowsAzureGuestAgent') {
    $svc = Get-Service -Name $svcName -ErrorAction SilentlyContinue
    if ($null -eq $svc) {
        Write-Output ">>> kiln: service $svcName is not installed: not waiting for it (local build, no Azure fabric)"
        continue
    }
    Write-Output ">>> Waiting for GA Service ($svcName) to start ..."
    $deadline = (Get-Date).AddMinutes($ServiceWaitMinutes)
    while ((Get-Service -Name $svcName).Status -ne 'Running') {
        if ((Get-Date) -gt $deadline) {
            Write-Output ">>> kiln: $svcName is still $((Get-Service -Name $svcName).Status) after $ServiceWaitMinutes minutes: going on without it"
            break
        }
        Start-Sleep -Seconds 5
    }
}

Remove-AnswerFiles
Disable-BuildUser

Write-Output '>>> Sysprepping VM ...'
& $env:SystemRoot\System32\Sysprep\Sysprep.exe /oobe /generalize /quiet /quit
$deadline = (Get-Date).AddMinutes($ImageStateMinutes)
$imageState = ''
while ($true) {
    $imageState = (Get-ItemProperty HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Setup\State).ImageState
    Write-Output $imageState
    if ($imageState -eq 'IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE') { break }
    if ((Get-Date) -gt $deadline) {
        Write-Output ">>> kiln: sysprep did not finish within $ImageStateMinutes minutes; ImageState stuck at $imageState (see C:\Windows\System32\Sysprep\Panther\setuperr.log)"
        exit 1
    }
    Start-Sleep -Seconds 5
}
Write-Output '>>> Sysprep complete ...'
exit 0
