"""DICOM de-identification after the PS3.15 Annex E basic application level confidentiality profile.

What happens to a dataset (recursively, sequences included):
- every attribute of the basic profile table (PS3.15 2024b, E.1-1) is removed, or emptied where
  the attribute is type 2 (patient name and id, accession number,
  referring physician, study date and time, birth date, sex);
- every person name (VR PN) and every date, time and datetime (VR DA, TM, DT) is removed;
- every UID that is not a standard DICOM class or transfer syntax UID is replaced by a
  deterministic hash-based ``2.25.<int>`` UID, so the same study or series UID always maps to
  the same new UID and references between instances stay consistent;
- private tags, overlays (60xx), curves (50xx) and the file meta's AE titles, presentation
  addresses and private information are removed;
- ``PatientIdentityRemoved`` is set to YES and ``DeidentificationMethod`` says how.
``BurnedInAnnotation`` is kept: the validator rejects YES (pixels may show PHI) because overlays
derived from such pixels would carry it.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pydicom

DEFAULT_UID_SALT = "liverscan-deid-v1"
METHOD = "PS3.15 basic profile, liverscan ml_core.deid v2"  # LO: at most 64 chars

#: Type 2 attributes that stay present but empty (action Z of the basic profile).
EMPTIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDate",
    "StudyTime",
)

#: Attributes removed: every attribute of PS3.15 (2024b) table E.1-1 whose action is X, or D, Z
#: or a combination where this service needs no dummy value, except those handled by their VR
#: below (person names, dates and times removed, UIDs replaced) and the UID-only reference
#: sequences kept with their UIDs replaced (ReferencedImageSequence, SourceImageSequence: U*).
REMOVED = (
    "AcquisitionComments",
    "AcquisitionContextSequence",
    "AcquisitionDeviceProcessingDescription",
    "AcquisitionFieldOfViewLabel",
    "AcquisitionProtocolDescription",
    "ActualHumanPerformersSequence",
    "AdditionalPatientHistory",
    "AddressTrial",
    "AdmissionID",
    "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription",
    "Allergies",
    "AnnotationGroupDescription",
    "AnnotationGroupLabel",
    "Arbitrary",
    "AuthorObserverSequence",
    "BarcodeValue",
    "BeamDescription",
    "BolusDescription",
    "BranchOfService",
    "CameraOwnerName",
    "CassetteID",
    "CertificateOfSigner",
    "ClinicalTrialCoordinatingCenterName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSeriesDescription",
    "ClinicalTrialSeriesID",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSponsorName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "ClinicalTrialTimePointDescription",
    "ClinicalTrialTimePointID",
    "CommentsOnRadiationDose",
    "CommentsOnThePerformedProcedureStep",
    "CompensatorDescription",
    "ConceptualVolumeCombinationDescription",
    "ConceptualVolumeDescription",
    "ConfidentialityConstraintOnPatientDataDescription",
    "ConsultingPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ContainerComponentID",
    "ContainerDescription",
    "ContainerIdentifier",
    "ContentCreatorIdentificationCodeSequence",
    "ContentCreatorName",
    "ContentSequence",
    "ContrastBolusAgent",
    "ContributionDescription",
    "CountryOfResidence",
    "CurrentPatientLocation",
    "CustodialOrganizationSequence",
    "DataSetTrailingPadding",
    "DecompositionDescription",
    "DerivationDescription",
    "DestinationAE",
    "DetectorID",
    "DeviceAlternateIdentifier",
    "DeviceDescription",
    "DeviceLabel",
    "DeviceSerialNumber",
    "DeviceSettingDescription",
    "DigitalSignaturesSequence",
    "DischargeDiagnosisDescription",
    "DisplacementReferenceLabel",
    "DistributionAddress",
    "DistributionName",
    "DoseReferenceDescription",
    "EncapsulatedDocument",
    "EntityDescription",
    "EntityLabel",
    "EntityLongLabel",
    "EntityName",
    "EquipmentFrameOfReferenceDescription",
    "EthnicGroup",
    "FillerOrderNumberImagingServiceRequest",
    "FilterLookupTableDescription",
    "FixationDeviceDescription",
    "FlowIdentifier",
    "FlowIdentifierSequence",
    "FractionGroupDescription",
    "FractionationNotes",
    "FrameComments",
    "GPSAltitude",
    "GPSAltitudeRef",
    "GPSAreaInformation",
    "GPSDOP",
    "GPSDestBearing",
    "GPSDestBearingRef",
    "GPSDestDistance",
    "GPSDestDistanceRef",
    "GPSDestLatitude",
    "GPSDestLatitudeRef",
    "GPSDestLongitude",
    "GPSDestLongitudeRef",
    "GPSDifferential",
    "GPSImgDirection",
    "GPSImgDirectionRef",
    "GPSLatitude",
    "GPSLatitudeRef",
    "GPSLongitude",
    "GPSLongitudeRef",
    "GPSMapDatum",
    "GPSMeasureMode",
    "GPSProcessingMethod",
    "GPSSatellites",
    "GPSSpeed",
    "GPSSpeedRef",
    "GPSStatus",
    "GPSTrack",
    "GPSTrackRef",
    "GPSVersionID",
    "GantryID",
    "GeneratorID",
    "GraphicAnnotationSequence",
    "HumanPerformerName",
    "HumanPerformerOrganization",
    "IconImageSequence",
    "IdentifyingComments",
    "ImageComments",
    "ImagePresentationComments",
    "ImagingServiceRequestComments",
    "Impressions",
    "InstanceOriginStatus",
    "InstitutionAddress",
    "InstitutionCodeSequence",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionalDepartmentTypeCodeSequence",
    "InsurancePlanIdentification",
    "IntendedRecipientsOfResultsIdentificationSequence",
    "InterlockDescription",
    "InterlockOriginDescription",
    "InterpretationApproverSequence",
    "InterpretationAuthor",
    "InterpretationDiagnosisDescription",
    "InterpretationID",
    "InterpretationIDIssuer",
    "InterpretationRecorder",
    "InterpretationText",
    "InterpretationTranscriber",
    "IssuerOfAdmissionID",
    "IssuerOfAdmissionIDSequence",
    "IssuerOfClinicalTrialProtocolID",
    "IssuerOfClinicalTrialSeriesID",
    "IssuerOfClinicalTrialSiteID",
    "IssuerOfClinicalTrialSubjectID",
    "IssuerOfClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialTimePointID",
    "IssuerOfPatientID",
    "IssuerOfServiceEpisodeID",
    "IssuerOfServiceEpisodeIDSequence",
    "IssuerOfTheContainerIdentifierSequence",
    "IssuerOfTheSpecimenIdentifierSequence",
    "LabelText",
    "LensMake",
    "LensModel",
    "LensSerialNumber",
    "LensSpecification",
    "LongDeviceDescription",
    "MAC",
    "MakerNote",
    "ManufacturerDeviceIdentifier",
    "MedicalAlerts",
    "MedicalRecordLocator",
    "MilitaryRank",
    "ModifiedAttributesSequence",
    "ModifiedImageDescription",
    "ModifyingDeviceID",
    "ModifyingSystem",
    "MultienergyAcquisitionDescription",
    "NameOfPhysiciansReadingStudy",
    "NamesOfIntendedRecipientsOfResults",
    "NetworkID",
    "NonconformingDataElementValue",
    "NonconformingModifiedAttributesSequence",
    "Occupation",
    "OperatorIdentificationSequence",
    "OperatorsName",
    "OrderCallbackPhoneNumber",
    "OrderCallbackTelecomInformation",
    "OrderEnteredBy",
    "OrderEntererLocation",
    "OriginalAttributesSequence",
    "Originator",
    "OtherClinicalTrialProtocolIDsSequence",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "ParticipantSequence",
    "PatientAddress",
    "PatientAge",
    "PatientAlternativeCalendar",
    "PatientBirthDateInAlternativeCalendar",
    "PatientBirthName",
    "PatientBirthTime",
    "PatientComments",
    "PatientDeathDateInAlternativeCalendar",
    "PatientInstitutionResidence",
    "PatientInsurancePlanCodeSequence",
    "PatientMotherBirthName",
    "PatientPrimaryLanguageCodeSequence",
    "PatientPrimaryLanguageModifierCodeSequence",
    "PatientReligiousPreference",
    "PatientSetupPhotoDescription",
    "PatientSexNeutered",
    "PatientSize",
    "PatientState",
    "PatientTelecomInformation",
    "PatientTelephoneNumbers",
    "PatientTransportArrangements",
    "PatientTreatmentPreparationMethodDescription",
    "PatientTreatmentPreparationProcedureParameterDescription",
    "PatientWeight",
    "PerformedLocation",
    "PerformedProcedureStepDescription",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedStationGeographicLocationCodeSequence",
    "PerformedStationName",
    "PerformedStationNameCodeSequence",
    "PerformingPhysicianIdentificationSequence",
    "PerformingPhysicianName",
    "PersonAddress",
    "PersonIdentificationCodeSequence",
    "PersonName",
    "PersonTelecomInformation",
    "PersonTelephoneNumbers",
    "PhysicianApprovingInterpretation",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence",
    "PlacerOrderNumberImagingServiceRequest",
    "PlateID",
    "PositionAcquisitionTemplateDescription",
    "PositionAcquisitionTemplateName",
    "PreMedication",
    "PregnancyStatus",
    "PrescriptionDescription",
    "PrescriptionNotes",
    "PrescriptionNotesSequence",
    "PriorTreatmentDoseDescription",
    "ProtocolName",
    "PyramidDescription",
    "PyramidLabel",
    "ROICreatorSequence",
    "ROIDescription",
    "ROIGenerationDescription",
    "ROIInterpreterSequence",
    "ROIName",
    "ROIObservationDescription",
    "ROIObservationLabel",
    "RTAccessoryDeviceSlotID",
    "RTAccessoryHolderSlotID",
    "RTPhysicianIntentNarrative",
    "RTPlanDescription",
    "RTPlanLabel",
    "RTPlanName",
    "RTPrescriptionLabel",
    "RTToleranceSetLabel",
    "RTTreatmentApproachLabel",
    "RadiationDoseIdentificationLabel",
    "RadiationDoseInVivoMeasurementLabel",
    "RadiationGenerationModeDescription",
    "RadiationGenerationModeLabel",
    "ReasonForOmissionDescription",
    "ReasonForRequestedProcedureCodeSequence",
    "ReasonForStudy",
    "ReasonForSuperseding",
    "ReasonForTheAttributeModification",
    "ReasonForTheImagingServiceRequest",
    "ReasonForTheRequestedProcedure",
    "ReasonForVisit",
    "ReasonForVisitCodeSequence",
    "ReceivingAE",
    "ReferencedDigitalSignatureSequence",
    "ReferencedPatientAliasSequence",
    "ReferencedPatientPhotoSequence",
    "ReferencedPatientSequence",
    "ReferencedPerformedProcedureStepSequence",
    "ReferencedSOPInstanceMACSequence",
    "ReferencedStudySequence",
    "ReferringPhysicianAddress",
    "ReferringPhysicianIdentificationSequence",
    "ReferringPhysicianTelephoneNumbers",
    "RegionOfResidence",
    "RequestAttributesSequence",
    "RequestedContrastAgent",
    "RequestedProcedureComments",
    "RequestedProcedureDescription",
    "RequestedProcedureID",
    "RequestedProcedureLocation",
    "RequestedSeriesDescription",
    "RequestingAE",
    "RequestingPhysician",
    "RequestingService",
    "RespiratoryMotionCompensationTechniqueDescription",
    "ResponsibleOrganization",
    "ResponsiblePerson",
    "ResultsComments",
    "ResultsDistributionListSequence",
    "ResultsID",
    "ResultsIDIssuer",
    "RetrieveAETitle",
    "ReviewerName",
    "ScheduledHumanPerformersSequence",
    "ScheduledPatientInstitutionResidence",
    "ScheduledPerformingPhysicianIdentificationSequence",
    "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepLocation",
    "ScheduledStationAETitle",
    "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledStationName",
    "ScheduledStationNameCodeSequence",
    "ScheduledStudyLocation",
    "ScheduledStudyLocationAETitle",
    "SelectorAEValue",
    "SelectorASValue",
    "SelectorLOValue",
    "SelectorLTValue",
    "SelectorOBValue",
    "SelectorSHValue",
    "SelectorSTValue",
    "SelectorUNValue",
    "SelectorURValue",
    "SelectorUTValue",
    "SeriesDescription",
    "ServiceEpisodeDescription",
    "ServiceEpisodeID",
    "SetupTechniqueDescription",
    "ShieldingDeviceDescription",
    "SlideIdentifier",
    "SmokingStatus",
    "SourceIdentifier",
    "SourceManufacturer",
    "SourceOfPreviousValues",
    "SourceSerialNumber",
    "SpecialNeeds",
    "SpecimenAccessionNumber",
    "SpecimenDetailedDescription",
    "SpecimenIdentifier",
    "SpecimenPreparationSequence",
    "SpecimenShortDescription",
    "StationAETitle",
    "StationName",
    "StructureSetDescription",
    "StructureSetLabel",
    "StructureSetName",
    "StudyComments",
    "StudyDescription",
    "StudyIDIssuer",
    "TelephoneNumberTrial",
    "TextComments",
    "TextString",
    "TimezoneOffsetFromUTC",
    "TopicAuthor",
    "TopicKeywords",
    "TopicSubject",
    "TopicTitle",
    "TransducerIdentificationSequence",
    "TreatmentMachineName",
    "TreatmentPositionGroupLabel",
    "TreatmentSite",
    "TreatmentSites",
    "TreatmentTechniqueNotes",
    "TreatmentToleranceViolationDescription",
    "UDISequence",
    "UniqueDeviceIdentifier",
    "UserContentLabel",
    "UserContentLongLabel",
    "VerbalSourceIdentifierCodeSequenceTrial",
    "VerifyingObserverIdentificationCodeSequence",
    "VerifyingObserverName",
    "VerifyingObserverSequence",
    "VerifyingOrganization",
    "VisitComments",
    "WaveformFilterDescription",
    "XRayDetectorID",
    "XRayDetectorLabel",
    "XRaySourceID",
)

#: File meta elements kept (group 0002): what a reader needs. The others name the sending and
#: receiving systems (AE titles, presentation addresses) or carry private information.
FILE_META_KEPT = frozenset(
    {
        "FileMetaInformationGroupLength",
        "FileMetaInformationVersion",
        "MediaStorageSOPClassUID",
        "MediaStorageSOPInstanceUID",
        "TransferSyntaxUID",
        "ImplementationClassUID",
        "ImplementationVersionName",
    }
)

#: Defined terms of Modality (PS3.3 C.7.3.1.1.1, retired ones included) and of Photometric
#: Interpretation (C.7.6.3.1.2): the only values of these headers a report may repeat. Any other
#: value is free text in a code-shaped field (16 characters fit a name) and is not repeated.
MODALITY_TERMS = frozenset(
    """AR ASMT AU BDUS BI BMD CD CF CFM CP CR CS CT CTPROTOCOL DD DF DG DM DMS DOC DS DX EC ECG
    EEG EMG EOG EPS ES FA FID FS GM HC HD IO IOL IVOCT IVUS KER KO LEN LP LS M3D MA MG MR MS NM
    OAM OCT OP OPM OPR OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR PT PX REG RESP RF RG RTDOSE
    RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF ST STAIN
    TEXTUREMAP TG US VA VF XA XAPROTOCOL XC""".split()
)
PHOTOMETRIC_TERMS = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "PALETTE COLOR",
        "RGB",
        "HSV",
        "ARGB",
        "CMYK",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_PARTIAL_422",
        "YBR_PARTIAL_420",
        "YBR_ICT",
        "YBR_RCT",
        "XYB",
    }
)

_SAFE_CS = re.compile(r"^[A-Z0-9_ ]{1,16}$")


def remap_uid(uid: str, *, salt: str = DEFAULT_UID_SALT) -> str:
    """Return a deterministic ``2.25.<int>`` UID for ``uid`` (same input → same output)."""
    digest = hashlib.sha256(f"{salt}\x00{uid.strip()}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _is_standard_uid(value: str) -> bool:
    from pydicom.uid import UID_dictionary

    return value.strip() in UID_dictionary


def _remap_value(value: Any, salt: str) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_remap_value(v, salt) for v in value]
    text = str(value)
    if not text or _is_standard_uid(text):
        return value
    return remap_uid(text, salt=salt)


def _drop_unreadable(dataset: pydicom.Dataset) -> None:
    """Delete, at any depth, the elements pydicom cannot parse (a corrupt VR or length): what
    cannot be read cannot be checked, so it is not kept, and it would stop the walk."""
    for tag in list(dataset.keys()):
        try:
            elem = dataset[tag]
            items = list(elem.value) if elem.VR == "SQ" else []
        except Exception:  # pydicom raises many types on corrupt elements
            del dataset[tag]
            continue
        for item in items:
            _drop_unreadable(item)


def deidentify(ds: pydicom.Dataset, *, uid_salt: str = DEFAULT_UID_SALT) -> pydicom.Dataset:
    """Return a de-identified copy of ``ds`` (PS3.15 basic profile); the input is left unchanged."""
    from pydicom.datadict import tag_for_keyword

    out = copy.deepcopy(ds)
    _drop_unreadable(out)
    out.remove_private_tags()
    removed = {tag_for_keyword(k) for k in REMOVED} - {None}
    emptied = {tag_for_keyword(k) for k in EMPTIED} - {None}

    def scrub(dataset: pydicom.Dataset, elem: Any) -> None:
        tag = elem.tag
        if tag in emptied and dataset is out:
            return
        if (
            tag in removed
            or tag in emptied
            or elem.VR in ("PN", "DA", "TM", "DT")
            or tag.group & 0xFF00 in (0x5000, 0x6000)
        ):
            del dataset[tag]
        elif elem.VR == "UI" and elem.value:
            elem.value = _remap_value(elem.value, uid_salt)

    out.walk(scrub)
    for keyword in EMPTIED:
        setattr(out, keyword, "")
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = METHOD
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        for elem in list(meta):  # AE titles, presentation addresses, private information
            if elem.keyword not in FILE_META_KEPT:
                del meta[elem.tag]
        if "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = _remap_value(
                meta.MediaStorageSOPInstanceUID, uid_salt
            )
    return out


def header_value(ds: pydicom.Dataset, keyword: str) -> Any:
    """Return an attribute value, or None when absent or not parseable (corrupt headers)."""
    try:
        return ds.get(keyword)
    except Exception:
        return None


def code_string(value: Any) -> str | None:
    """Return a code string value only when it is a plain short code (never free text)."""
    text = str(value or "").strip().upper()
    return text if _SAFE_CS.match(text) else None


def header_summary(ds: pydicom.Dataset, *, uid_salt: str = DEFAULT_UID_SALT) -> dict[str, Any]:
    """Return the few de-identified header fields the service keeps (no PHI; UIDs remapped)."""
    meta = getattr(ds, "file_meta", None)
    ts = header_value(meta, "TransferSyntaxUID") if meta is not None else None

    def uid(keyword: str) -> str | None:
        value = header_value(ds, keyword)
        return _remap_value(str(value), uid_salt) if value else None

    def number(keyword: str) -> int | None:
        try:
            value = header_value(ds, keyword)
            return int(value) if value is not None and value != "" else None
        except Exception:
            return None

    spacing = None
    try:
        sp = header_value(ds, "PixelSpacing")
        if sp is not None and len(sp) == 2:
            spacing = [float(sp[0]), float(sp[1])]
    except Exception:
        spacing = None
    image_type = header_value(ds, "ImageType")
    sop_class = str(header_value(ds, "SOPClassUID") or "")
    values = (
        list(image_type)
        if image_type is not None and not isinstance(image_type, str)
        else ([image_type] if image_type else [])
    )
    return {
        "modality": code_string(header_value(ds, "Modality")),
        "body_part": code_string(header_value(ds, "BodyPartExamined")),
        "image_type": [v for v in (code_string(x) for x in values) if v],
        "photometric_interpretation": code_string(header_value(ds, "PhotometricInterpretation")),
        "rows": number("Rows"),
        "columns": number("Columns"),
        "frames": number("NumberOfFrames") or 1,
        "pixel_spacing_mm": spacing,
        "transfer_syntax": str(ts) if ts and _is_standard_uid(str(ts)) else None,
        "sop_class_uid": sop_class if sop_class and _is_standard_uid(sop_class) else None,
        "study_uid": uid("StudyInstanceUID"),
        "series_uid": uid("SeriesInstanceUID"),
        "burned_in_annotation": code_string(header_value(ds, "BurnedInAnnotation")),
    }
