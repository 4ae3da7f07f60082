// Runs PixelMed's DicomSRValidator on several files in one JVM (its main() takes one file and the
// validator's XSLT set-up dominates the run time). Prints "== <file>" before each file's report.
// Run: java -cp /usr/share/java/pixelmed.jar PixelmedSRValidateMany.java a.dcm b.dcm ...

import com.pixelmed.validate.DicomSRValidator;

public class PixelmedSRValidateMany {
    public static void main(String[] args) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        for (String path : args) {
            System.out.println("== " + path);
            System.out.println(validator.validate(path));
        }
    }
}
